//! `sigstore-kms-keybroker`: the KMS plugin that lets stock cosign sign through
//! keybrokerd (`cosign sign --key keybroker://ALIAS IMAGE`).
//!
//! The protocol is sigstore's `pkg/signature/kms/cliplugin` (v1): cosign runs
//! `sigstore-kms-keybroker v1 'PLUGIN-ARGS-JSON'` with the message, if any, on
//! stdin, and reads exactly one JSON `PluginResp` from stdout. Field names of
//! the arguments are matched case-insensitively (Go's encoding/json does);
//! `[]byte` fields are standard padded base64; errors go in `errorMessage`
//! (cosign ignores the exit status); diagnostics go to stderr.
//!
//! Policy still applies: a message is sent to the broker as it is
//! (`SignMessage`), so the broker can recognize a cosign payload or an in-toto
//! statement and apply its image policy. A bare digest (the crypto-signer
//! path: empty stdin, `messageOptions.digest`) is raw signing (`Sign`), which
//! the broker allows only for keys whose policy says `allow_raw_digest`.

use std::{
    io::Read,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use base64::{engine::general_purpose::STANDARD, Engine};
use keybroker_proto::v1::{PublicKeyRequest, SignMessageRequest, SignRequest};
use keybroker_providers::Sha256Digest;
use serde_json::{json, Value};

use crate::broker;

/// The only protocol version spoken.
pub const PROTOCOL_VERSION: &str = "v1";
/// sigstore's name of the one algorithm keybroker keys use.
pub const ALGORITHM: &str = "ecdsa-p256-sha256";
/// The key reference scheme (`keybroker://ALIAS`).
pub const SCHEME: &str = "keybroker://";
/// How long a call may take when cosign gives no deadline.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Go's `crypto.SHA256`.
const GO_SHA256: u64 = 5;
/// Messages above this size are hashed here and signed as a digest (the
/// broker's SignMessage limit; such messages are blobs, never image payloads).
const MAX_MESSAGE_BYTES: usize = 1 << 20;

/// An error for `errorMessage`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginError(pub String);

impl<T: std::fmt::Display> From<T> for PluginError {
    fn from(e: T) -> Self {
        PluginError(e.to_string())
    }
}

fn err<T>(msg: impl Into<String>) -> Result<T, PluginError> {
    Err(PluginError(msg.into()))
}

/// Runs one plugin invocation: `args` is argv without the program name,
/// `stdin` the message. Returns the JSON response (one line) and whether it
/// is a success.
pub fn run(args: &[String], stdin: &mut dyn Read) -> (String, bool) {
    match invoke(args, stdin) {
        Ok(v) => (v.to_string(), true),
        Err(PluginError(m)) => (json!({ "errorMessage": m }).to_string(), false),
    }
}

fn invoke(args: &[String], stdin: &mut dyn Read) -> Result<Value, PluginError> {
    let (version, raw) = match args {
        [v, a, ..] => (v, a),
        _ => {
            return err(format!(
                "usage: sigstore-kms-keybroker {PROTOCOL_VERSION} PLUGIN-ARGS-JSON (run by cosign for --key {SCHEME}ALIAS)"
            ))
        }
    };
    if version != PROTOCOL_VERSION {
        return err(format!(
            "protocol version {version:?} is not supported: this plugin speaks {PROTOCOL_VERSION}"
        ));
    }
    let args: Value = serde_json::from_str(raw)
        .map_err(|e| PluginError(format!("plugin arguments are not JSON: {e}")))?;
    if !args.is_object() {
        return err("plugin arguments must be a JSON object");
    }
    let method = get(&args, "methodName")
        .and_then(Value::as_str)
        .ok_or_else(|| PluginError("plugin arguments have no methodName".into()))?;
    // These two never fail: cosign aborts on an error there.
    match method {
        "defaultAlgorithm" => {
            return Ok(json!({ "defaultAlgorithm": { "defaultAlgorithm": ALGORITHM } }))
        }
        "supportedAlgorithms" => {
            return Ok(json!({ "supportedAlgorithms": { "supportedAlgorithms": [ALGORITHM] } }))
        }
        _ => {}
    }
    let init = get(&args, "initOptions").unwrap_or(&Value::Null);
    if let Some(v) = get(init, "protocolVersion").and_then(Value::as_str) {
        if v != PROTOCOL_VERSION {
            return err(format!(
                "initOptions.protocolVersion {v:?} is not supported: this plugin speaks {PROTOCOL_VERSION}"
            ));
        }
    }
    check_hash(get(init, "hashFunc"), "initOptions.hashFunc")?;
    let method_args = get(&args, method).unwrap_or(&Value::Null);
    // Deadlines can come with the init options and with the method's options;
    // the earliest wins.
    let mut deadlines = vec![
        get(init, "ctxDeadline"),
        get(
            get(init, "rpcOptions").unwrap_or(&Value::Null),
            "ctxDeadline",
        ),
        get(method_args, "ctxDeadline"),
    ];
    let opts = match method {
        "publicKey" => get(method_args, "publicKeyOptions"),
        "signMessage" => get(method_args, "signOptions"),
        "verifySignature" => get(method_args, "verifyOptions"),
        _ => None,
    }
    .unwrap_or(&Value::Null);
    let rpc = get(opts, "rpcOptions").unwrap_or(&Value::Null);
    deadlines.push(get(rpc, "ctxDeadline"));
    let budget = budget(&deadlines)?;
    let key_version = get(rpc, "keyVersion")
        .and_then(Value::as_str)
        .filter(|v| !v.is_empty())
        .map(str::to_string);
    let message_options = get(opts, "messageOptions").unwrap_or(&Value::Null);

    if method == "createKey" {
        return err(format!(
            "keybroker does not create keys through cosign: create one with `keybroker generate-key-pair` (or in your KMS), add it to keybrokerd's config as [keys.ALIAS], and use --key {SCHEME}ALIAS"
        ));
    }
    if !matches!(method, "publicKey" | "signMessage" | "verifySignature") {
        return err(format!("unknown method {method:?}"));
    }
    let alias = key_alias(get(init, "keyResourceID").and_then(Value::as_str))?;

    let call = Call {
        alias,
        key_version,
        method: method.to_string(),
    };
    let request = match method {
        "publicKey" => Request::PublicKey,
        "signMessage" => {
            check_hash(get(message_options, "hashFunc"), "messageOptions.hashFunc")?;
            let digest = digest_option(message_options)?;
            let message = read_message(stdin)?;
            Request::Sign { message, digest }
        }
        _ => {
            check_hash(get(message_options, "hashFunc"), "messageOptions.hashFunc")?;
            let signature = match get(method_args, "signature") {
                Some(Value::String(s)) => STANDARD
                    .decode(s)
                    .map_err(|e| PluginError(format!("verifySignature.signature: {e}")))?,
                _ => return err("verifySignature has no signature"),
            };
            let digest = digest_option(message_options)?;
            let message = read_message(stdin)?;
            Request::Verify {
                message,
                digest,
                signature,
            }
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        match tokio::time::timeout(budget, call.run(request)).await {
            Ok(r) => r,
            Err(_) => err(format!(
                "keybrokerd did not answer {} for key {:?} within the deadline ({budget:?})",
                call.method, call.alias
            )),
        }
    })
}

enum Request {
    PublicKey,
    Sign {
        message: Vec<u8>,
        digest: Option<Vec<u8>>,
    },
    Verify {
        message: Vec<u8>,
        digest: Option<Vec<u8>>,
        signature: Vec<u8>,
    },
}

struct Call {
    alias: String,
    key_version: Option<String>,
    method: String,
}

impl Call {
    fn check_version(&self, got: &str) -> Result<(), PluginError> {
        match &self.key_version {
            Some(want) if want != got => err(format!(
                "key {:?}: version {want:?} was asked for, the broker's key is at {got:?}",
                self.alias
            )),
            _ => Ok(()),
        }
    }

    async fn run(&self, request: Request) -> Result<Value, PluginError> {
        let mut client = broker::connect(target_from_env()?).await?;
        let broker_err = |e: tonic::Status| PluginError(crate::Error::Broker(e).to_string());
        match request {
            Request::PublicKey => {
                let pem = self.public_key(&mut client).await?;
                Ok(json!({ "publicKey": { "publicKeyPEM": STANDARD.encode(pem) } }))
            }
            Request::Sign { message, digest } => {
                let digest = message_digest(&message, digest.as_deref())?;
                let (signature, key) = if message.is_empty() && digest.is_some() {
                    // The crypto-signer path: only a digest.
                    let r = client
                        .sign(SignRequest {
                            key: self.alias.clone(),
                            digest: digest.iter().flat_map(|d| d.as_bytes()).copied().collect(),
                        })
                        .await
                        .map_err(broker_err)?
                        .into_inner();
                    (r.signature, r.key)
                } else if message.len() > MAX_MESSAGE_BYTES {
                    let d = Sha256Digest::of(&message);
                    eprintln!(
                        "sigstore-kms-keybroker: message of {} bytes is signed as its SHA-256 digest (raw signing)",
                        message.len()
                    );
                    let r = client
                        .sign(SignRequest {
                            key: self.alias.clone(),
                            digest: d.as_bytes().to_vec(),
                        })
                        .await
                        .map_err(broker_err)?
                        .into_inner();
                    (r.signature, r.key)
                } else {
                    let r = client
                        .sign_message(SignMessageRequest {
                            key: self.alias.clone(),
                            message,
                        })
                        .await
                        .map_err(broker_err)?
                        .into_inner();
                    eprintln!("sigstore-kms-keybroker: signed ({})", r.kind);
                    (r.signature, r.key)
                };
                if let Some(k) = &key {
                    self.check_version(&k.version)?;
                }
                Ok(json!({ "signMessage": { "signature": STANDARD.encode(signature) } }))
            }
            Request::Verify {
                message,
                digest,
                signature,
            } => {
                let digest = match message_digest(&message, digest.as_deref())? {
                    Some(d) => d,
                    None => Sha256Digest::of(&message),
                };
                let pem = self.public_key(&mut client).await?;
                keybroker_providers::ecdsa::verify_digest(&pem, &digest, &signature).map_err(
                    |e| {
                        PluginError(format!(
                            "signature does not verify with keybroker key {:?}: {e}",
                            self.alias
                        ))
                    },
                )?;
                Ok(json!({ "verifySignature": {} }))
            }
        }
    }

    async fn public_key(&self, client: &mut broker::Client) -> Result<String, PluginError> {
        let r = client
            .public_key(PublicKeyRequest {
                key: self.alias.clone(),
            })
            .await
            .map_err(|e| PluginError(crate::Error::Broker(e).to_string()))?
            .into_inner();
        let key = r
            .key
            .ok_or_else(|| PluginError("the broker sent no key".into()))?;
        self.check_version(&key.version)?;
        if key.public_key_pem.is_empty() {
            return err(format!(
                "the broker has no public key for {:?} yet",
                self.alias
            ));
        }
        Ok(key.public_key_pem)
    }
}

/// The SHA-256 to sign or verify: the message's, checked against the digest
/// cosign sent along, or the digest alone when there is no message.
fn message_digest(
    message: &[u8],
    digest: Option<&[u8]>,
) -> Result<Option<Sha256Digest>, PluginError> {
    let given = match digest {
        None => None,
        Some(d) => Some(Sha256Digest::try_from(d).map_err(|_| {
            PluginError(format!(
                "messageOptions.digest is {} bytes; only SHA-256 (32 bytes) is supported",
                d.len()
            ))
        })?),
    };
    if message.is_empty() {
        return Ok(given);
    }
    let computed = Sha256Digest::of(message);
    match given {
        Some(g) if g.as_bytes() != computed.as_bytes() => {
            err("messageOptions.digest is not the SHA-256 of the message on stdin")
        }
        _ => Ok(Some(computed)),
    }
}

/// `messageOptions.digest`: absent, null or "" mean none.
fn digest_option(opts: &Value) -> Result<Option<Vec<u8>>, PluginError> {
    match get(opts, "digest") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => STANDARD
            .decode(s)
            .map(Some)
            .map_err(|e| PluginError(format!("messageOptions.digest: {e}"))),
        Some(_) => err("messageOptions.digest must be base64 text"),
    }
}

/// Refuses hash functions other than SHA-256 (Go's crypto.Hash 5; 0 = unset).
fn check_hash(v: Option<&Value>, what: &str) -> Result<(), PluginError> {
    match v {
        None | Some(Value::Null) => Ok(()),
        Some(Value::Number(n)) if n.as_u64() == Some(0) || n.as_u64() == Some(GO_SHA256) => Ok(()),
        Some(other) => err(format!(
            "{what} {other} is not supported: keybroker keys sign SHA-256 only (Go crypto.Hash 5)"
        )),
    }
}

fn read_message(stdin: &mut dyn Read) -> Result<Vec<u8>, PluginError> {
    let mut buf = Vec::new();
    stdin
        .read_to_end(&mut buf)
        .map_err(|e| PluginError(format!("reading the message from stdin: {e}")))?;
    Ok(buf)
}

/// The alias from `keyResourceID` (cosign sends the part after `keybroker://`;
/// the whole reference is accepted too).
fn key_alias(id: Option<&str>) -> Result<String, PluginError> {
    let id = id.unwrap_or_default();
    let alias = id.strip_prefix(SCHEME).unwrap_or(id);
    if alias.is_empty() || alias.contains('/') || alias.len() > 128 {
        return err(format!(
            "key reference {id:?}: expected {SCHEME}ALIAS, ALIAS being a key of keybrokerd's config"
        ));
    }
    Ok(alias.to_string())
}

/// Where the broker is, as the `keybroker` CLI finds it with no flags:
/// `$KEYBROKER_URL` (with `$KEYBROKER_TLS_CERT`, `_KEY`, `_CA`), else
/// `$KEYBROKER_SOCKET`, else the daemon's default socket.
pub fn target_from_env() -> Result<broker::Target, PluginError> {
    let var = |n: &str| std::env::var_os(n).filter(|v| !v.is_empty());
    match var("KEYBROKER_URL") {
        None => Ok(broker::Target::Unix(broker::socket_path(None))),
        Some(url) => match (
            var("KEYBROKER_TLS_CERT"),
            var("KEYBROKER_TLS_KEY"),
            var("KEYBROKER_TLS_CA"),
        ) {
            (Some(cert), Some(key), Some(ca)) => Ok(broker::Target::Tls {
                url: url.to_string_lossy().into_owned(),
                cert: cert.into(),
                key: key.into(),
                ca: ca.into(),
            }),
            _ => err("KEYBROKER_URL needs KEYBROKER_TLS_CERT, KEYBROKER_TLS_KEY and KEYBROKER_TLS_CA (keybrokerd's TCP listener is mutual TLS only)"),
        },
    }
}

/// The time left until the earliest deadline (or [`DEFAULT_TIMEOUT`]), less a
/// margin so the answer is written before cosign's context kills the plugin.
fn budget(deadlines: &[Option<&Value>]) -> Result<Duration, PluginError> {
    let now = SystemTime::now();
    let mut earliest: Option<SystemTime> = None;
    for d in deadlines.iter().flatten() {
        let t = match d {
            Value::Null => continue,
            Value::String(s) => parse_rfc3339(s)
                .ok_or_else(|| PluginError(format!("ctxDeadline {s:?} is not RFC 3339")))?,
            other => return err(format!("ctxDeadline {other} is not RFC 3339 text")),
        };
        earliest = Some(earliest.map_or(t, |e| e.min(t)));
    }
    let Some(deadline) = earliest else {
        return Ok(DEFAULT_TIMEOUT);
    };
    let left = deadline
        .duration_since(now)
        .map_err(|_| PluginError("the deadline cosign gave has already passed".into()))?;
    let margin = (left / 10).min(Duration::from_millis(250));
    Ok(left - margin)
}

/// RFC 3339 date-time (`2025-04-01T02:47:00Z`, `…T02:47:00.123456789+02:00`).
pub fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = b.get(r)?;
        if part.iter().all(u8::is_ascii_digit) {
            std::str::from_utf8(part).ok()?.parse().ok()
        } else {
            None
        }
    };
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut i = 19;
    let mut nanos: u64 = 0;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            if i - start < 9 {
                nanos = nanos * 10 + u64::from(b[i] - b'0');
            }
            i += 1;
        }
        if i == start {
            return None;
        }
        for _ in (i - start)..9 {
            nanos *= 10;
        }
    }
    let offset = match b.get(i)? {
        b'Z' | b'z' if i + 1 == b.len() => 0,
        sign @ (b'+' | b'-') if i + 6 == b.len() && b[i + 3] == b':' => {
            let (oh, om) = (num(i + 1..i + 3)?, num(i + 4..i + 6)?);
            if oh > 23 || om > 59 {
                return None;
            }
            let o = oh * 3600 + om * 60;
            if *sign == b'+' {
                o
            } else {
                -o
            }
        }
        _ => return None,
    };
    // Days from 1970-01-01 (Howard Hinnant's days_from_civil).
    let (y, mo) = if mo <= 2 {
        (y - 1, mo + 9)
    } else {
        (y, mo - 3)
    };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * mo + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 + sec - offset;
    let t = if secs >= 0 {
        UNIX_EPOCH.checked_add(Duration::from_secs(secs as u64))?
    } else {
        UNIX_EPOCH.checked_sub(Duration::from_secs(secs.unsigned_abs()))?
    };
    t.checked_add(Duration::from_nanos(nanos))
}

/// Go's encoding/json key folding: ASCII case, plus the non-ASCII letters
/// whose simple case folding lands on ASCII (Kelvin sign, long s, dotted and
/// dotless i).
fn fold_eq(a: &str, b: &str) -> bool {
    let f = |c: char| match c {
        '\u{212A}' => 'K',
        '\u{017F}' => 'S',
        '\u{0130}' | '\u{0131}' => 'I',
        c => c.to_ascii_uppercase(),
    };
    a.chars().map(f).eq(b.chars().map(f))
}

/// A field of a JSON object matched as Go's encoding/json matches struct
/// fields: the exact name first, else a case-insensitive match.
fn get<'a>(v: &'a Value, name: &str) -> Option<&'a Value> {
    let m = v.as_object()?;
    m.get(name)
        .or_else(|| m.iter().find(|(k, _)| fold_eq(k, name)).map(|(_, v)| v))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> u64 {
        parse_rfc3339(s)
            .unwrap()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    #[test]
    fn rfc3339_with_any_offset_and_fraction() {
        assert_eq!(at("2025-04-01T02:47:00Z"), 1_743_475_620);
        assert_eq!(at("2025-04-01T04:47:00+02:00"), 1_743_475_620);
        assert_eq!(at("2025-03-31T21:47:00-05:00"), 1_743_475_620);
        assert_eq!(at("1970-01-01T00:00:00Z"), 0);
        assert_eq!(at("2000-02-29T00:00:00Z"), 951_782_400);
        let t = parse_rfc3339("2025-04-01T02:47:00.123456789Z").unwrap();
        assert_eq!(
            t.duration_since(UNIX_EPOCH).unwrap().subsec_nanos(),
            123_456_789
        );
        let t = parse_rfc3339("2025-04-01T02:47:00.5+00:00").unwrap();
        assert_eq!(t.duration_since(UNIX_EPOCH).unwrap().subsec_millis(), 500);
        for bad in [
            "2025-04-01",
            "2025-04-01T02:47:00",
            "2025-13-01T02:47:00Z",
            "2025-04-01T02:47:00.Z",
            "2025-04-01T02:47:00+0200",
            "2025-04-01T02:47:00Zjunk",
            "2025-04-01T2:47:00Z",
        ] {
            assert!(parse_rfc3339(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn fields_match_case_insensitively() {
        let v = json!({"MethodName": "x", "initoptions": {"KEYRESOURCEID": "a"}, "methodName2": 1});
        assert_eq!(get(&v, "methodName"), Some(&json!("x")));
        assert_eq!(
            get(get(&v, "initOptions").unwrap(), "keyResourceID"),
            Some(&json!("a"))
        );
        assert_eq!(get(&json!({"ſignature": 1}), "signature"), Some(&json!(1)));
        assert_eq!(get(&v, "missing"), None);
    }

    #[test]
    fn never_fails_for_algorithms_and_refuses_other_versions() {
        let run1 = |args: &[&str]| {
            let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
            let (out, ok) = run(&args, &mut std::io::empty());
            (serde_json::from_str::<Value>(&out).unwrap(), ok)
        };
        let (v, ok) = run1(&[
            "v1",
            r#"{"methodName":"defaultAlgorithm","defaultAlgorithm":{}}"#,
        ]);
        assert!(ok);
        assert_eq!(v["defaultAlgorithm"]["defaultAlgorithm"], ALGORITHM);
        let (v, ok) = run1(&["v2", r#"{"methodName":"defaultAlgorithm"}"#]);
        assert!(!ok);
        assert!(v["errorMessage"].as_str().unwrap().contains("v2"));
        let (v, _) = run1(&["v1", "{"]);
        assert!(v["errorMessage"].as_str().unwrap().contains("not JSON"));
        let (v, _) = run1(&[
            "v1",
            r#"{"initOptions":{"keyResourceID":"k","hashFunc":7},"methodName":"publicKey"}"#,
        ]);
        assert!(
            v["errorMessage"].as_str().unwrap().contains("SHA-256"),
            "{v}"
        );
    }

    #[test]
    fn digests_must_match_the_message() {
        let d = Sha256Digest::of(b"m");
        assert!(message_digest(b"m", Some(d.as_bytes())).is_ok());
        assert!(message_digest(b"other", Some(d.as_bytes())).is_err());
        assert!(message_digest(b"", Some(&[1; 31])).is_err());
        assert_eq!(message_digest(b"", None).unwrap(), None);
        assert!(key_alias(Some("keybroker://release")).is_ok());
        assert_eq!(key_alias(Some("release")).unwrap(), "release");
        assert!(key_alias(Some("")).is_err());
        assert!(key_alias(Some("a/b")).is_err());
    }
}
