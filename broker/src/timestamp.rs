//! RFC 3161 timestamps from a time-stamp authority (`[timestamp]`).
//!
//! A Sigstore bundle needs a transparency-log entry or a signed timestamp, or
//! strict verifiers refuse it. keybroker writes no public log, so the daemon
//! asks a TSA for a timestamp over each bundle signature and hands out the
//! TSA's TimeStampResp (see [`Stamp::response`]) with the signature. The message imprint is SHA-256 of the raw DER signature
//! bytes, which is what every Sigstore verifier hashes (read in their sources:
//! sigstore-go `pkg/verify/tsa.go` passes `SignatureContent.Signature()` — for
//! DSSE the envelope's first `sig`, base64-decoded — to timestamp-authority's
//! `VerifyTimestampResponse`; sigstore-js `verify/src/verifier.ts` passes
//! `entity.signature.signature`, the same bytes (`bundle/dsse.ts`);
//! sigstore-rust `sigstore-verify` `extract_signature` → `sigstore-tsa`
//! `verify_message_imprint`, hashed with the imprint's algorithm).
//!
//! A reply is network input, so it is parsed defensively (strict DER through
//! `der`, no panics) and checked the way a verifier will check it before it is
//! handed out: status granted, our imprint and nonce, the CMS signature over
//! the signed attributes (content type TSTInfo, message digest of the
//! TSTInfo), and the signer's chain to the configured root with the
//! timeStamping extended key usage (rustls-webpki). When `ca_chain` holds the
//! TSA's own certificate (leaf first, as in a Sigstore trusted root), the
//! token must be signed by exactly that certificate, as sigstore-rust
//! requires. Written from RFC 3161 and RFC 5652; no code copied.

use std::{path::Path, time::Duration};

use der::{asn1::AnyRef, Decode, Reader, SliceReader, Tag, TagNumber, Tagged};
use rustls_pki_types::{pem::PemObject, CertificateDer, UnixTime};
use sha2::Digest;

use crate::config::TimestampConfig;

/// Seconds to wait for the TSA when `timeout_secs` is unset.
pub const DEFAULT_TIMEOUT_SECS: u64 = 10;
/// A reply larger than this is not a timestamp (tokens are a few KiB).
const MAX_REPLY_BYTES: usize = 256 * 1024;
/// How far the token's time may be from the daemon's clock.
const MAX_CLOCK_SKEW_SECS: i64 = 600;

const OID_SIGNED_DATA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x07, 0x02];
const OID_CT_TSTINFO: &[u8] = &[
    0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x10, 0x01, 0x04,
];
const OID_ATTR_CONTENT_TYPE: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x03];
const OID_ATTR_MESSAGE_DIGEST: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x04];
const OID_SHA256: &[u8] = &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x01];
const OID_SHA384: &[u8] = &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x02];
const OID_SHA512: &[u8] = &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02, 0x03];
const OID_EC_PUBLIC_KEY: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
const OID_P256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const OID_P384: &[u8] = &[0x2b, 0x81, 0x04, 0x00, 0x22];
const OID_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
const OID_SUBJECT_KEY_ID: &[u8] = &[0x55, 0x1d, 0x0e];
/// id-kp-timeStamping (1.3.6.1.5.5.7.3.8), the only EKU a TSA certificate may have.
const OID_KP_TIME_STAMPING: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x08];

/// `https://`, or `http://` to a loopback address (tests, a local TSA proxy) —
/// the rule `[[oidc]] jwks_url` follows.
pub fn tsa_url(url: &str) -> Result<reqwest::Url, String> {
    let u = reqwest::Url::parse(url).map_err(|e| format!("url {url:?}: {e}"))?;
    let host = u.host_str().unwrap_or("");
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|a| a.is_loopback());
    match u.scheme() {
        "https" => Ok(u),
        "http" if loopback => Ok(u),
        _ => Err(format!(
            "url must be https:// (plain http only to a loopback address): {url}"
        )),
    }
}

/// The configured TSA: where it is, and what its tokens must chain to.
pub struct Tsa {
    url: reqwest::Url,
    http: reqwest::Client,
    timeout: Duration,
    trust: Trust,
}

impl std::fmt::Debug for Tsa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tsa")
            .field("url", &self.url.as_str())
            .field("timeout", &self.timeout)
            .field("pinned_leaf", &self.trust.leaf.is_some())
            .finish()
    }
}

/// `ca_chain`, split the way a Sigstore trusted root's TSA entry is read.
struct Trust {
    /// The TSA certificate itself, when the chain has more than one entry.
    leaf: Option<CertificateDer<'static>>,
    intermediates: Vec<CertificateDer<'static>>,
    root: CertificateDer<'static>,
}

/// A checked timestamp: what to hand out and what the audit log records.
#[derive(Debug, Clone)]
pub struct Stamp {
    /// The TSA's whole TimeStampResp (DER), exactly as it sent it: status
    /// granted, then the TimeStampToken. This, not the bare token, is what a
    /// bundle's `rfc3161Timestamps[].signedTimestamp` holds ("the DER encoded
    /// TimeStampResponse", sigstore_common.proto); sigstore-go (through
    /// timestamp-authority's `VerifyTimestampResponse` → `ParseResponse`) and
    /// sigstore-js parse it as one, sigstore-rust accepts either.
    pub response: Vec<u8>,
    /// The TSA's time (TSTInfo genTime), RFC 3339.
    pub gen_time: String,
    /// The TSA's serial number of this token, hex.
    pub serial: String,
}

impl Tsa {
    /// Reads `ca_chain` and checks that its TSA certificate (if it has one)
    /// chains to its root with the timeStamping usage, so a wrong file is a
    /// config error at start or reload, not a failure of every request.
    pub fn new(cfg: &TimestampConfig) -> Result<Self, String> {
        let url = tsa_url(&cfg.url).map_err(|e| format!("[timestamp]: {e}"))?;
        let trust = Trust::load(&cfg.ca_chain)
            .map_err(|e| format!("[timestamp] ca_chain {}: {e}", cfg.ca_chain.display()))?;
        let timeout = Duration::from_secs(cfg.timeout_secs.unwrap_or(DEFAULT_TIMEOUT_SECS).max(1));
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("[timestamp]: HTTP client: {e}"))?;
        Ok(Tsa {
            url,
            http,
            timeout,
            trust,
        })
    }

    /// The TSA's URL (for messages and the audit log).
    pub fn url(&self) -> &str {
        self.url.as_str()
    }

    /// Asks the TSA for a token over `signature` and checks it. The error is
    /// one line saying what went wrong, never a panic, whatever the TSA sends.
    pub async fn stamp(&self, signature: &[u8]) -> Result<Stamp, String> {
        let digest: [u8; 32] = sha2::Sha256::digest(signature).into();
        let mut nonce = [0u8; 8];
        aws_lc_rs::rand::fill(&mut nonce).map_err(|_| "no randomness for the nonce")?;
        let nonce = u64::from_be_bytes(nonce);
        let query = request(&digest, nonce);
        let resp = self
            .http
            .post(self.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/timestamp-query")
            .header(reqwest::header::ACCEPT, "application/timestamp-reply")
            .body(query)
            .send()
            .await
            .map_err(|e| self.http_error(&e))?;
        let status = resp.status();
        let body = read_capped(resp)
            .await
            .map_err(|e| self.http_error(&e))?
            .ok_or_else(|| format!("reply larger than {MAX_REPLY_BYTES} bytes"))?;
        if !status.is_success() {
            let text = printable(&body, 200);
            return Err(if text.is_empty() {
                format!("HTTP {status}")
            } else {
                format!("HTTP {status}: {text}")
            });
        }
        self.check(&body, &digest, nonce, unix_now())
    }

    fn http_error(&self, e: &reqwest::Error) -> String {
        if e.is_timeout() {
            return format!("no answer within {} s", self.timeout.as_secs());
        }
        let mut msg = e.to_string();
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            msg.push_str(&format!(": {s}"));
            source = s.source();
        }
        msg
    }

    /// Checks a TimeStampResp against the query it answers (imprint `digest`,
    /// `nonce`) at `now` (Unix seconds).
    pub fn check(
        &self,
        reply: &[u8],
        digest: &[u8; 32],
        nonce: u64,
        now: i64,
    ) -> Result<Stamp, String> {
        let token = granted_token(reply)?;
        let signed = SignedToken::parse(token).map_err(|e| format!("token: {e}"))?;
        let info = TstInfo::parse(signed.tst_info).map_err(|e| format!("TSTInfo: {e}"))?;
        if info.imprint_alg != OID_SHA256 || info.imprint != digest {
            return Err("the token's message imprint is not the SHA-256 of this signature".into());
        }
        match info.nonce {
            Some(n) if int_eq_u64(n, nonce) => {}
            Some(_) => return Err("the token's nonce is not the one we sent".into()),
            None => return Err("the token has no nonce (we sent one)".into()),
        }
        let when = gen_time(info.gen_time)?;
        if (when.unix - now).abs() > MAX_CLOCK_SKEW_SECS {
            return Err(format!(
                "the token's time {} is {} s away from this host's clock",
                when.rfc3339,
                when.unix - now
            ));
        }
        let signer = self.signer(&signed)?;
        verify_signer_info(&signed.signer, signed.tst_info, &signer)?;
        self.check_chain(&signer, &signed, when.unix)?;
        Ok(Stamp {
            response: reply.to_vec(),
            gen_time: when.rfc3339,
            serial: hex::encode(info.serial),
        })
    }

    /// The certificate that signed the token: the configured TSA certificate
    /// if `ca_chain` has one, else the one the token carries.
    fn signer<'a>(&'a self, signed: &SignedToken<'a>) -> Result<Cert<'a>, String> {
        let candidates: Vec<&[u8]> = match &self.trust.leaf {
            Some(leaf) => vec![leaf.as_ref()],
            None => signed.certs.clone(),
        };
        for der in candidates {
            let cert = Cert::parse(der).map_err(|e| format!("TSA certificate: {e}"))?;
            if signed.signer.sid.matches(&cert) {
                return Ok(cert);
            }
        }
        Err(match &self.trust.leaf {
            Some(_) => "the token is not signed by the TSA certificate in ca_chain".into(),
            None => "the token carries no certificate matching its signer".into(),
        })
    }

    fn check_chain(
        &self,
        signer: &Cert<'_>,
        signed: &SignedToken<'_>,
        at: i64,
    ) -> Result<(), String> {
        let mut intermediates = self.trust.intermediates.clone();
        if self.trust.leaf.is_none() {
            intermediates.extend(
                signed
                    .certs
                    .iter()
                    .map(|c| CertificateDer::from(c.to_vec())),
            );
        }
        verify_tsa_cert(signer.der, &self.trust.root, &intermediates, at)
    }
}

impl Trust {
    fn load(path: &Path) -> Result<Self, String> {
        let pem = std::fs::read(path).map_err(|e| e.to_string())?;
        let mut certs = Vec::new();
        for c in CertificateDer::pem_slice_iter(&pem) {
            certs.push(c.map_err(|e| format!("PEM: {e}"))?);
        }
        let Some(root) = certs.pop() else {
            return Err("no certificate in the file".into());
        };
        for c in certs.iter().chain(std::iter::once(&root)) {
            Cert::parse(c.as_ref()).map_err(|e| format!("certificate: {e}"))?;
        }
        webpki::anchor_from_trusted_cert(&root)
            .map_err(|e| format!("the last certificate is no usable root: {e}"))?;
        let leaf = if certs.is_empty() {
            None
        } else {
            Some(certs.remove(0))
        };
        if let Some(leaf) = &leaf {
            verify_tsa_cert(leaf.as_ref(), &root, &certs, unix_now()).map_err(|e| {
                format!("the first certificate (the TSA's) is not valid for timestamping now: {e}")
            })?;
        }
        Ok(Trust {
            leaf,
            intermediates: certs,
            root,
        })
    }
}

/// The chain from `cert` to `root` at time `at`, with the timeStamping EKU.
fn verify_tsa_cert(
    cert: &[u8],
    root: &CertificateDer<'static>,
    intermediates: &[CertificateDer<'static>],
    at: i64,
) -> Result<(), String> {
    let anchor = webpki::anchor_from_trusted_cert(root).map_err(|e| format!("root: {e}"))?;
    let der = CertificateDer::from(cert);
    let ee = webpki::EndEntityCert::try_from(&der).map_err(|e| format!("TSA certificate: {e}"))?;
    let time = UnixTime::since_unix_epoch(Duration::from_secs(u64::try_from(at).unwrap_or(0)));
    ee.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &[anchor],
        intermediates,
        time,
        webpki::KeyUsage::required(OID_KP_TIME_STAMPING),
        None,
        None,
    )
    .map(|_| ())
    .map_err(|e| {
        format!("TSA certificate does not chain to ca_chain's root for timestamping: {e:?}")
    })
}

/// DER TimeStampReq v1 (RFC 3161 §2.4.1): SHA-256 imprint, our nonce, and
/// certReq so the token carries the TSA's certificate.
pub fn request(digest: &[u8; 32], nonce: u64) -> Vec<u8> {
    // AlgorithmIdentifier { sha256, NULL }: the form OpenSSL and most TSAs send.
    let alg = tlv(0x30, &[tlv(0x06, OID_SHA256), vec![0x05, 0x00]].concat());
    let imprint = tlv(0x30, &[alg, tlv(0x04, digest)].concat());
    let body = [
        tlv(0x02, &[0x01]),
        imprint,
        tlv(0x02, &uint_value(nonce)),
        tlv(0x01, &[0xff]),
    ]
    .concat();
    tlv(0x30, &body)
}

fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let n = content.len();
    if n < 0x80 {
        out.push(n as u8);
    } else {
        let len = n.to_be_bytes();
        let skip = len.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (len.len() - skip) as u8);
        out.extend_from_slice(&len[skip..]);
    }
    out.extend_from_slice(content);
    out
}

/// The minimal DER INTEGER contents of a non-negative number.
fn uint_value(v: u64) -> Vec<u8> {
    let b = v.to_be_bytes();
    let skip = b.iter().take_while(|x| **x == 0).count().min(7);
    let mut out = b[skip..].to_vec();
    if out[0] & 0x80 != 0 {
        out.insert(0, 0);
    }
    out
}

/// Whether a DER INTEGER's contents are the number `n`.
fn int_eq_u64(value: &[u8], n: u64) -> bool {
    if value.first().is_none_or(|b| b & 0x80 != 0) {
        return false; // empty or negative
    }
    let v = match value {
        [0, rest @ ..] if !rest.is_empty() => rest,
        v => v,
    };
    if v.len() > 8 {
        return false;
    }
    let mut buf = [0u8; 8];
    buf[8 - v.len()..].copy_from_slice(v);
    u64::from_be_bytes(buf) == n
}

/// The token of a TimeStampResp whose status is granted (or grantedWithMods).
fn granted_token(reply: &[u8]) -> Result<&[u8], String> {
    let bad = |e: String| format!("the reply is not a TimeStampResp: {e}");
    let mut top = Der::new(reply).map_err(bad)?;
    let resp = top.expect(Tag::Sequence, "TimeStampResp").map_err(bad)?;
    if !top.done() {
        return Err(bad("data after the TimeStampResp".into()));
    }
    let mut r = resp.inner().map_err(bad)?;
    let mut s = r
        .expect(Tag::Sequence, "PKIStatusInfo")
        .and_then(|t| t.inner())
        .map_err(bad)?;
    let status = s.expect(Tag::Integer, "status").map_err(bad)?;
    let text: Vec<String> = match s.optional(Tag::Sequence, "statusString").map_err(bad)? {
        Some(t) => {
            let mut strings = t.inner().map_err(bad)?;
            let mut out = Vec::new();
            while !strings.done() {
                let t = strings.next("statusString").map_err(bad)?;
                out.push(printable(t.value, 200));
            }
            out
        }
        None => Vec::new(),
    };
    let fail = s.optional(Tag::BitString, "failInfo").map_err(bad)?;
    match status.value {
        [0] | [1] => {}
        v => {
            let name = match v {
                [2] => "rejection".to_string(),
                [3] => "waiting".to_string(),
                [4] => "revocationWarning".to_string(),
                [5] => "revocationNotification".to_string(),
                _ => format!("unknown status 0x{}", hex::encode(v)),
            };
            let mut msg = format!("the TSA refused: {name}");
            if !text.is_empty() {
                msg.push_str(&format!(" ({})", text.join("; ")));
            }
            if let Some(f) = fail {
                msg.push_str(&format!(" [failInfo: {}]", fail_info(f.value)));
            }
            return Err(msg);
        }
    }
    let token = r
        .expect(Tag::Sequence, "timeStampToken")
        .map_err(|_| "the TSA granted the request but sent no token".to_string())?;
    if !r.done() {
        return Err(bad("data after the token".into()));
    }
    Ok(token.raw)
}

/// PKIFailureInfo bit names (RFC 3161 §2.4.2).
fn fail_info(bits: &[u8]) -> String {
    const NAMES: &[(usize, &str)] = &[
        (0, "badAlg"),
        (2, "badRequest"),
        (5, "badDataFormat"),
        (14, "timeNotAvailable"),
        (15, "unacceptedPolicy"),
        (16, "unacceptedExtension"),
        (17, "addInfoNotAvailable"),
        (25, "systemFailure"),
    ];
    let data = bits.get(1..).unwrap_or(&[]);
    let set = |i: usize| data.get(i / 8).is_some_and(|b| b & (0x80 >> (i % 8)) != 0);
    let names: Vec<&str> = NAMES
        .iter()
        .filter(|(i, _)| set(*i))
        .map(|(_, n)| *n)
        .collect();
    if names.is_empty() {
        "none named".into()
    } else {
        names.join(", ")
    }
}

/// What the checks need from a TimeStampToken (CMS SignedData, RFC 5652 §5).
struct SignedToken<'a> {
    /// The encapsulated TSTInfo (DER), the bytes the signature covers.
    tst_info: &'a [u8],
    /// Certificates the token carries (untrusted until chained).
    certs: Vec<&'a [u8]>,
    signer: SignerInfo<'a>,
}

struct SignerInfo<'a> {
    sid: Sid<'a>,
    digest_alg: &'a [u8],
    /// The `[0] IMPLICIT` signed attributes exactly as received.
    signed_attrs: &'a [u8],
    signature: &'a [u8],
}

enum Sid<'a> {
    IssuerSerial { issuer: &'a [u8], serial: &'a [u8] },
    KeyId(&'a [u8]),
}

impl Sid<'_> {
    fn matches(&self, cert: &Cert<'_>) -> bool {
        match self {
            Sid::IssuerSerial { issuer, serial } => {
                *issuer == cert.issuer && *serial == cert.serial
            }
            Sid::KeyId(k) => cert.key_id == Some(*k),
        }
    }
}

impl<'a> SignedToken<'a> {
    fn parse(token: &'a [u8]) -> Result<Self, String> {
        let mut ci = Der::new(token)?
            .expect(Tag::Sequence, "ContentInfo")?
            .inner()?;
        let ct = ci.expect(Tag::ObjectIdentifier, "contentType")?;
        if ct.value != OID_SIGNED_DATA {
            return Err("not CMS SignedData".into());
        }
        let mut sd = ci
            .expect(ctx(0, true), "content")?
            .inner()?
            .expect(Tag::Sequence, "SignedData")?
            .inner()?;
        sd.expect(Tag::Integer, "version")?;
        sd.expect(Tag::Set, "digestAlgorithms")?;
        let mut eci = sd.expect(Tag::Sequence, "encapContentInfo")?.inner()?;
        if eci.expect(Tag::ObjectIdentifier, "eContentType")?.value != OID_CT_TSTINFO {
            return Err("the signed content is not a TSTInfo".into());
        }
        let tst_info = eci
            .expect(ctx(0, true), "eContent")?
            .inner()?
            .expect(Tag::OctetString, "eContent")?
            .value;
        let mut certs = Vec::new();
        if let Some(set) = sd.optional(ctx(0, true), "certificates")? {
            let mut set = set.inner()?;
            while !set.done() {
                let c = set.next("certificate")?;
                if c.tag == Tag::Sequence {
                    certs.push(c.raw);
                }
            }
        }
        sd.optional(ctx(1, true), "crls")?;
        let mut infos = sd.expect(Tag::Set, "signerInfos")?.inner()?;
        let info = infos.expect(Tag::Sequence, "SignerInfo")?;
        if !infos.done() {
            return Err("more than one signer".into());
        }
        let mut si = info.inner()?;
        si.expect(Tag::Integer, "SignerInfo version")?;
        let sid = si.next("sid")?;
        let sid = if sid.tag == Tag::Sequence {
            let mut ias = sid.inner()?;
            let issuer = ias.expect(Tag::Sequence, "issuer")?.raw;
            let serial = ias.expect(Tag::Integer, "serialNumber")?.value;
            Sid::IssuerSerial { issuer, serial }
        } else if sid.tag == ctx(0, false) {
            Sid::KeyId(sid.value)
        } else {
            return Err(format!("unknown signer identifier {}", sid.tag));
        };
        let digest_alg = si
            .expect(Tag::Sequence, "digestAlgorithm")?
            .inner()?
            .expect(Tag::ObjectIdentifier, "digestAlgorithm")?
            .value;
        let signed_attrs = si
            .expect(ctx(0, true), "signedAttrs (a TSA must sign attributes)")?
            .raw;
        si.expect(Tag::Sequence, "signatureAlgorithm")?;
        let signature = si.expect(Tag::OctetString, "signature")?.value;
        Ok(SignedToken {
            tst_info,
            certs,
            signer: SignerInfo {
                sid,
                digest_alg,
                signed_attrs,
                signature,
            },
        })
    }
}

/// The TSTInfo fields the checks use (RFC 3161 §2.4.2).
struct TstInfo<'a> {
    imprint_alg: &'a [u8],
    imprint: &'a [u8],
    serial: &'a [u8],
    gen_time: &'a [u8],
    nonce: Option<&'a [u8]>,
}

impl<'a> TstInfo<'a> {
    fn parse(der: &'a [u8]) -> Result<Self, String> {
        let mut top = Der::new(der)?;
        let mut t = top.expect(Tag::Sequence, "TSTInfo")?.inner()?;
        if !top.done() {
            return Err("data after the TSTInfo".into());
        }
        if t.expect(Tag::Integer, "version")?.value != [1] {
            return Err("version is not 1".into());
        }
        t.expect(Tag::ObjectIdentifier, "policy")?;
        let mut mi = t.expect(Tag::Sequence, "messageImprint")?.inner()?;
        let imprint_alg = mi
            .expect(Tag::Sequence, "hashAlgorithm")?
            .inner()?
            .expect(Tag::ObjectIdentifier, "hashAlgorithm")?
            .value;
        let imprint = mi.expect(Tag::OctetString, "hashedMessage")?.value;
        let serial = t.expect(Tag::Integer, "serialNumber")?.value;
        let gen_time = t.expect(Tag::GeneralizedTime, "genTime")?.value;
        t.optional(Tag::Sequence, "accuracy")?;
        t.optional(Tag::Boolean, "ordering")?;
        let nonce = t.optional(Tag::Integer, "nonce")?.map(|n| n.value);
        Ok(TstInfo {
            imprint_alg,
            imprint,
            serial,
            gen_time,
            nonce,
        })
    }
}

/// The parts of an X.509 certificate the CMS checks need, as raw DER.
struct Cert<'a> {
    der: &'a [u8],
    issuer: &'a [u8],
    serial: &'a [u8],
    key_alg: &'a [u8],
    key_param: Option<&'a [u8]>,
    key: &'a [u8],
    key_id: Option<&'a [u8]>,
}

impl<'a> Cert<'a> {
    fn parse(der: &'a [u8]) -> Result<Self, String> {
        let mut top = Der::new(der)?;
        let mut cert = top.expect(Tag::Sequence, "Certificate")?.inner()?;
        if !top.done() {
            return Err("data after the certificate".into());
        }
        let mut tbs = cert.expect(Tag::Sequence, "tbsCertificate")?.inner()?;
        tbs.optional(ctx(0, true), "version")?;
        let serial = tbs.expect(Tag::Integer, "serialNumber")?.value;
        tbs.expect(Tag::Sequence, "signature")?;
        let issuer = tbs.expect(Tag::Sequence, "issuer")?.raw;
        tbs.expect(Tag::Sequence, "validity")?;
        tbs.expect(Tag::Sequence, "subject")?;
        let mut spki = tbs.expect(Tag::Sequence, "subjectPublicKeyInfo")?.inner()?;
        let mut alg = spki.expect(Tag::Sequence, "algorithm")?.inner()?;
        let key_alg = alg.expect(Tag::ObjectIdentifier, "algorithm")?.value;
        let key_param = alg
            .optional(Tag::ObjectIdentifier, "parameters")?
            .map(|p| p.value);
        let bits = spki.expect(Tag::BitString, "subjectPublicKey")?.value;
        let key = match bits {
            [0, key @ ..] => key,
            _ => return Err("public key is not a whole number of bytes".into()),
        };
        tbs.optional(ctx(1, false), "issuerUniqueID")?;
        tbs.optional(ctx(2, false), "subjectUniqueID")?;
        let mut key_id = None;
        if let Some(ext) = tbs.optional(ctx(3, true), "extensions")? {
            let mut list = ext.inner()?.expect(Tag::Sequence, "extensions")?.inner()?;
            while !list.done() {
                let mut e = list.expect(Tag::Sequence, "extension")?.inner()?;
                let id = e.expect(Tag::ObjectIdentifier, "extnID")?.value;
                e.optional(Tag::Boolean, "critical")?;
                let value = e.expect(Tag::OctetString, "extnValue")?.value;
                if id == OID_SUBJECT_KEY_ID {
                    key_id = Some(
                        Der::new(value)?
                            .expect(Tag::OctetString, "subjectKeyIdentifier")?
                            .value,
                    );
                }
            }
        }
        Ok(Cert {
            der,
            issuer,
            serial,
            key_alg,
            key_param,
            key,
            key_id,
        })
    }
}

/// The signer's signature over its signed attributes, which must name
/// TSTInfo as the content type and carry the TSTInfo's digest.
fn verify_signer_info(si: &SignerInfo<'_>, tst_info: &[u8], cert: &Cert<'_>) -> Result<(), String> {
    let digest: Vec<u8> = match si.digest_alg {
        OID_SHA256 => sha2::Sha256::digest(tst_info).to_vec(),
        OID_SHA384 => sha2::Sha384::digest(tst_info).to_vec(),
        OID_SHA512 => sha2::Sha512::digest(tst_info).to_vec(),
        _ => return Err("the token's digest algorithm is not SHA-256/384/512".into()),
    };
    let attrs = Der::new(si.signed_attrs)?.next("signedAttrs")?;
    let mut list = attrs.inner()?;
    let (mut content_type, mut message_digest) = (None, None);
    while !list.done() {
        let mut a = list.expect(Tag::Sequence, "attribute")?.inner()?;
        let id = a.expect(Tag::ObjectIdentifier, "attrType")?.value;
        let mut values = a.expect(Tag::Set, "attrValues")?.inner()?;
        let slot = match id {
            OID_ATTR_CONTENT_TYPE => &mut content_type,
            OID_ATTR_MESSAGE_DIGEST => &mut message_digest,
            _ => continue,
        };
        let v = values.next("attrValue")?;
        if slot.is_some() || !values.done() {
            return Err("a signed attribute appears more than once".into());
        }
        *slot = Some(v);
    }
    match content_type {
        Some(v) if v.tag == Tag::ObjectIdentifier && v.value == OID_CT_TSTINFO => {}
        _ => return Err("the signed content-type attribute is not TSTInfo".into()),
    }
    match message_digest {
        Some(v) if v.tag == Tag::OctetString && v.value == digest.as_slice() => {}
        _ => return Err("the signed message digest is not the TSTInfo's".into()),
    }
    // RFC 5652 §5.4: the signature covers the attributes with an explicit SET OF tag.
    let mut signed = si.signed_attrs.to_vec();
    signed[0] = 0x31;
    use aws_lc_rs::signature as sig;
    let alg: &'static dyn sig::VerificationAlgorithm = match (
        cert.key_alg,
        cert.key_param,
        si.digest_alg,
    ) {
        (OID_EC_PUBLIC_KEY, Some(OID_P256), OID_SHA256) => &sig::ECDSA_P256_SHA256_ASN1,
        (OID_EC_PUBLIC_KEY, Some(OID_P256), OID_SHA384) => &sig::ECDSA_P256_SHA384_ASN1,
        (OID_EC_PUBLIC_KEY, Some(OID_P384), OID_SHA256) => &sig::ECDSA_P384_SHA256_ASN1,
        (OID_EC_PUBLIC_KEY, Some(OID_P384), OID_SHA384) => &sig::ECDSA_P384_SHA384_ASN1,
        (OID_RSA, _, OID_SHA256) => &sig::RSA_PKCS1_2048_8192_SHA256,
        (OID_RSA, _, OID_SHA384) => &sig::RSA_PKCS1_2048_8192_SHA384,
        (OID_RSA, _, OID_SHA512) => &sig::RSA_PKCS1_2048_8192_SHA512,
        _ => return Err(
            "the TSA's key type and digest are not supported (EC P-256/P-384 or RSA with SHA-2)"
                .into(),
        ),
    };
    sig::UnparsedPublicKey::new(alg, cert.key)
        .verify(&signed, si.signature)
        .map_err(|_| "the token's signature does not verify with the TSA certificate".into())
}

struct When {
    unix: i64,
    rfc3339: String,
}

/// GeneralizedTime `YYYYMMDDHHMMSS[.f*]Z` (RFC 3161 §2.4.2 allows a fraction).
fn gen_time(v: &[u8]) -> Result<When, String> {
    let bad = || "the token's genTime is not YYYYMMDDHHMMSS[.fff]Z".to_string();
    let s = std::str::from_utf8(v).map_err(|_| bad())?;
    let s = s.strip_suffix('Z').ok_or_else(bad)?;
    let (whole, frac) = match s.split_once('.') {
        Some((w, f)) if !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()) => (w, Some(f)),
        Some(_) => return Err(bad()),
        None => (s, None),
    };
    if whole.len() != 14 || !whole.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n = |r: std::ops::Range<usize>| whole[r].parse::<u16>().map_err(|_| bad());
    let month = time::Month::try_from(n(4..6)? as u8).map_err(|_| bad())?;
    let date = time::Date::from_calendar_date(i32::from(n(0..4)?), month, n(6..8)? as u8)
        .map_err(|_| bad())?;
    let t = time::Time::from_hms(n(8..10)? as u8, n(10..12)? as u8, n(12..14)? as u8)
        .map_err(|_| bad())?;
    let unix = time::PrimitiveDateTime::new(date, t)
        .assume_utc()
        .unix_timestamp();
    let frac = frac.map(|f| format!(".{f}")).unwrap_or_default();
    Ok(When {
        unix,
        rfc3339: format!(
            "{}-{}-{}T{}:{}:{}{frac}Z",
            &whole[0..4],
            &whole[4..6],
            &whole[6..8],
            &whole[8..10],
            &whole[10..12],
            &whole[12..14]
        ),
    })
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// At most `max` printable ASCII characters of untrusted bytes, for messages.
fn printable(b: &[u8], max: usize) -> String {
    String::from_utf8_lossy(b)
        .chars()
        .filter(|c| c.is_ascii_graphic() || *c == ' ')
        .take(max)
        .collect::<String>()
        .trim()
        .to_string()
}

/// The body, or `None` when it is larger than [`MAX_REPLY_BYTES`].
async fn read_capped(mut resp: reqwest::Response) -> Result<Option<Vec<u8>>, reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        if body.len() + chunk.len() > MAX_REPLY_BYTES {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body))
}

fn ctx(number: u32, constructed: bool) -> Tag {
    Tag::ContextSpecific {
        constructed,
        number: TagNumber(number),
    }
}

/// One DER element: its tag, its contents and its whole encoding.
#[derive(Clone, Copy)]
struct Tlv<'a> {
    tag: Tag,
    value: &'a [u8],
    raw: &'a [u8],
}

impl<'a> Tlv<'a> {
    fn inner(&self) -> Result<Der<'a>, String> {
        Der::new(self.value)
    }
}

/// Consecutive DER elements, read with `der`'s strict length rules.
struct Der<'a>(SliceReader<'a>);

impl<'a> Der<'a> {
    fn new(bytes: &'a [u8]) -> Result<Self, String> {
        SliceReader::new(bytes).map(Der).map_err(|e| e.to_string())
    }

    fn done(&self) -> bool {
        self.0.is_finished()
    }

    fn peek(&self) -> Option<Tag> {
        if self.done() {
            None
        } else {
            Tag::peek(&self.0).ok()
        }
    }

    fn next(&mut self, what: &str) -> Result<Tlv<'a>, String> {
        if self.done() {
            return Err(format!("{what}: missing"));
        }
        let raw = self.0.tlv_bytes().map_err(|e| format!("{what}: {e}"))?;
        let any = AnyRef::from_der(raw).map_err(|e| format!("{what}: {e}"))?;
        Ok(Tlv {
            tag: any.tag(),
            value: any.value(),
            raw,
        })
    }

    fn expect(&mut self, tag: Tag, what: &str) -> Result<Tlv<'a>, String> {
        let t = self.next(what)?;
        if t.tag != tag {
            return Err(format!("{what}: expected {tag}, found {}", t.tag));
        }
        Ok(t)
    }

    fn optional(&mut self, tag: Tag, what: &str) -> Result<Option<Tlv<'a>>, String> {
        if self.peek() == Some(tag) {
            self.next(what).map(Some)
        } else {
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    //! Real tokens from `openssl ts -reply` (OpenSSL's TSA), with test CAs
    //! made here, so the parser is checked against a real implementation.
    use super::*;
    use std::{path::PathBuf, process::Command};

    fn openssl(dir: &Path, args: &[&str]) -> Vec<u8> {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl (the TSA of these tests) must be installed");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// Two CAs, each with a TSA, and a timeStamping-less leaf under the first.
    struct Pki {
        dir: tempfile::TempDir,
    }

    impl Pki {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let d = dir.path();
            std::fs::write(
                d.join("ext.cnf"),
                "[req]\ndistinguished_name = dn\n[dn]\n\
                 [ca]\nbasicConstraints = critical,CA:true\nkeyUsage = critical,keyCertSign\nsubjectKeyIdentifier = hash\n\
                 [tsa]\nbasicConstraints = critical,CA:false\nkeyUsage = critical,digitalSignature\n\
                 extendedKeyUsage = critical,timeStamping\nsubjectKeyIdentifier = hash\n\
                 [plain]\nbasicConstraints = critical,CA:false\nkeyUsage = critical,digitalSignature\n\
                 extendedKeyUsage = codeSigning\n",
            )
            .unwrap();
            for (ca, curve) in [("root", "prime256v1"), ("other", "secp384r1")] {
                openssl(
                    d,
                    &[
                        "ecparam",
                        "-name",
                        curve,
                        "-genkey",
                        "-noout",
                        "-out",
                        &format!("{ca}.key"),
                    ],
                );
                openssl(
                    d,
                    &[
                        "req",
                        "-new",
                        "-x509",
                        "-key",
                        &format!("{ca}.key"),
                        "-out",
                        &format!("{ca}.pem"),
                        "-days",
                        "30",
                        "-subj",
                        &format!("/CN=test {ca} CA"),
                        "-config",
                        "ext.cnf",
                        "-extensions",
                        "ca",
                    ],
                );
            }
            for (leaf, ca, ext, curve) in [
                ("tsa", "root", "tsa", "prime256v1"),
                ("othertsa", "other", "tsa", "secp384r1"),
                ("plain", "root", "plain", "prime256v1"),
            ] {
                openssl(
                    d,
                    &[
                        "ecparam",
                        "-name",
                        curve,
                        "-genkey",
                        "-noout",
                        "-out",
                        &format!("{leaf}.key"),
                    ],
                );
                openssl(
                    d,
                    &[
                        "req",
                        "-new",
                        "-key",
                        &format!("{leaf}.key"),
                        "-out",
                        &format!("{leaf}.csr"),
                        "-subj",
                        &format!("/CN=test {leaf}"),
                        "-config",
                        "ext.cnf",
                    ],
                );
                openssl(
                    d,
                    &[
                        "x509",
                        "-req",
                        "-in",
                        &format!("{leaf}.csr"),
                        "-CA",
                        &format!("{ca}.pem"),
                        "-CAkey",
                        &format!("{ca}.key"),
                        "-set_serial",
                        "7",
                        "-days",
                        "30",
                        "-extfile",
                        "ext.cnf",
                        "-extensions",
                        ext,
                        "-out",
                        &format!("{leaf}.pem"),
                    ],
                );
            }
            let mut cnf = String::from("[tsa]\ndefault_tsa = good\n");
            for (section, cert, ca) in [("good", "tsa", "root"), ("rogue", "othertsa", "other")] {
                cnf.push_str(&format!(
                    "[{section}]\nserial = {d}/serial\nsigner_cert = {d}/{cert}.pem\n\
                     signer_key = {d}/{cert}.key\ncerts = {d}/{ca}.pem\nsigner_digest = sha256\n\
                     default_policy = 1.2.3.4.1\ndigests = sha256\naccuracy = secs:1\n\
                     ess_cert_id_alg = sha256\n",
                    d = d.display()
                ));
            }
            std::fs::write(d.join("ts.cnf"), cnf).unwrap();
            std::fs::write(d.join("serial"), "01\n").unwrap();
            Pki { dir }
        }

        fn path(&self, name: &str) -> PathBuf {
            self.dir.path().join(name)
        }

        /// OpenSSL's TimeStampResp to `query`, signed by `section`'s TSA.
        fn reply(&self, section: &str, query: &[u8]) -> Vec<u8> {
            std::fs::write(self.path("q.tsq"), query).unwrap();
            openssl(
                self.dir.path(),
                &[
                    "ts",
                    "-reply",
                    "-config",
                    "ts.cnf",
                    "-section",
                    section,
                    "-queryfile",
                    "q.tsq",
                    "-out",
                    "r.tsr",
                ],
            );
            std::fs::read(self.path("r.tsr")).unwrap()
        }

        /// A client trusting the concatenation of `files` as its `ca_chain`.
        fn tsa(&self, files: &[&str]) -> Result<Tsa, String> {
            let mut pem = String::new();
            for f in files {
                pem.push_str(&std::fs::read_to_string(self.path(&format!("{f}.pem"))).unwrap());
            }
            let chain = self.path(&format!("chain-{}.pem", files.join("-")));
            std::fs::write(&chain, pem).unwrap();
            Tsa::new(&TimestampConfig {
                url: "http://127.0.0.1:9/".into(),
                ca_chain: chain,
                timeout_secs: None,
            })
        }
    }

    const DIGEST: [u8; 32] = [0x5a; 32];
    const NONCE: u64 = 0x8000_0000_0000_00ff;

    #[test]
    fn request_is_a_v1_query_openssl_reads() {
        let pki = Pki::new();
        let q = request(&DIGEST, NONCE);
        // SEQUENCE { INTEGER 1, SEQUENCE { SEQUENCE { sha256, NULL }, OCTET STRING }, INTEGER, TRUE }
        let mut top = Der::new(&q).unwrap();
        let mut r = top.expect(Tag::Sequence, "req").unwrap().inner().unwrap();
        assert!(top.done());
        assert_eq!(r.expect(Tag::Integer, "v").unwrap().value, [1]);
        let mut mi = r.expect(Tag::Sequence, "mi").unwrap().inner().unwrap();
        let mut alg = mi.expect(Tag::Sequence, "alg").unwrap().inner().unwrap();
        assert_eq!(
            alg.expect(Tag::ObjectIdentifier, "oid").unwrap().value,
            OID_SHA256
        );
        assert_eq!(mi.expect(Tag::OctetString, "h").unwrap().value, DIGEST);
        // The nonce's top bit is set, so DER needs a leading zero byte.
        assert_eq!(
            r.expect(Tag::Integer, "nonce").unwrap().value,
            [0, 0x80, 0, 0, 0, 0, 0, 0, 0xff]
        );
        assert_eq!(r.expect(Tag::Boolean, "certReq").unwrap().value, [0xff]);
        assert!(r.done());
        std::fs::write(pki.path("mine.tsq"), &q).unwrap();
        let text = String::from_utf8(openssl(
            pki.dir.path(),
            &["ts", "-query", "-in", "mine.tsq", "-text"],
        ))
        .unwrap();
        assert!(text.contains("Version: 1"), "{text}");
        assert!(text.contains("Hash Algorithm: sha256"), "{text}");
        assert!(text.contains("Nonce: 0x80000000000000FF"), "{text}");
        assert!(text.contains("Certificate required: yes"), "{text}");
        assert!(text.contains("5a 5a 5a 5a"), "{text}");
    }

    #[test]
    fn nonce_and_integer_encoding() {
        assert_eq!(uint_value(0), [0]);
        assert_eq!(uint_value(0x7f), [0x7f]);
        assert_eq!(uint_value(0x80), [0, 0x80]);
        assert_eq!(uint_value(0x0100), [1, 0]);
        assert_eq!(
            uint_value(u64::MAX),
            [0, 255, 255, 255, 255, 255, 255, 255, 255]
        );
        for n in [0, 1, 0x7f, 0x80, 0xffff, u64::MAX, NONCE] {
            assert!(int_eq_u64(&uint_value(n), n), "{n}");
            assert!(!int_eq_u64(&uint_value(n ^ 1), n), "{n}");
        }
        assert!(!int_eq_u64(&[0xff], 255), "negative");
        assert!(!int_eq_u64(&[], 0));
        assert!(!int_eq_u64(&[1, 0, 0, 0, 0, 0, 0, 0, 0], 0), "over 64 bits");
        assert_eq!(tlv(0x04, &[7; 200])[..3], [0x04, 0x81, 200]);
        assert_eq!(tlv(0x04, &[7; 300])[..4], [0x04, 0x82, 0x01, 0x2c]);
    }

    #[test]
    fn accepts_a_real_token_pinned_to_the_leaf_or_chained_to_the_root() {
        let pki = Pki::new();
        let reply = pki.reply("good", &request(&DIGEST, NONCE));
        for chain in [&["tsa", "root"][..], &["root"][..]] {
            let tsa = pki.tsa(chain).unwrap();
            let stamp = tsa.check(&reply, &DIGEST, NONCE, unix_now()).unwrap();
            // What is handed out is the TSA's reply, byte for byte.
            assert_eq!(stamp.response, reply);
            let token = granted_token(&stamp.response).unwrap();
            let info = TstInfo::parse(SignedToken::parse(token).unwrap().tst_info).unwrap();
            let when = gen_time(info.gen_time).unwrap();
            assert!((when.unix - unix_now()).abs() < 60);
            assert_eq!(stamp.gen_time, when.rfc3339);
            assert_eq!(stamp.serial, hex::encode(info.serial));
            // OpenSSL verifies it, as a response and as the bare token.
            std::fs::write(pki.path("resp.der"), &stamp.response).unwrap();
            std::fs::write(pki.path("tok.der"), token).unwrap();
            std::fs::write(pki.path("q.tsq"), request(&DIGEST, NONCE)).unwrap();
            for input in [
                &["-in", "resp.der"][..],
                &["-in", "tok.der", "-token_in"][..],
            ] {
                let mut args = vec!["ts", "-verify", "-queryfile", "q.tsq"];
                args.extend_from_slice(input);
                args.extend_from_slice(&["-CAfile", "root.pem", "-untrusted", "tsa.pem"]);
                openssl(pki.dir.path(), &args);
            }
        }
    }

    #[test]
    fn refuses_another_imprint_or_nonce() {
        let pki = Pki::new();
        let tsa = pki.tsa(&["tsa", "root"]).unwrap();
        let reply = pki.reply("good", &request(&DIGEST, NONCE));
        let mut other = DIGEST;
        other[31] ^= 1;
        let err = tsa.check(&reply, &other, NONCE, unix_now()).unwrap_err();
        assert!(err.contains("message imprint"), "{err}");
        let err = tsa
            .check(&reply, &DIGEST, NONCE + 1, unix_now())
            .unwrap_err();
        assert!(err.contains("nonce"), "{err}");
        let err = tsa
            .check(&reply, &DIGEST, NONCE, unix_now() + 3600)
            .unwrap_err();
        assert!(err.contains("away from this host's clock"), "{err}");
    }

    #[test]
    fn refuses_a_token_from_another_tsa() {
        let pki = Pki::new();
        let reply = pki.reply("rogue", &request(&DIGEST, NONCE));
        let err = pki
            .tsa(&["tsa", "root"])
            .unwrap()
            .check(&reply, &DIGEST, NONCE, unix_now());
        assert!(err
            .unwrap_err()
            .contains("not signed by the TSA certificate"));
        let err = pki
            .tsa(&["root"])
            .unwrap()
            .check(&reply, &DIGEST, NONCE, unix_now());
        assert!(err.unwrap_err().contains("does not chain"));
        // Trusting the rogue CA makes the same reply acceptable (the check is real).
        let ok = pki
            .tsa(&["othertsa", "other"])
            .unwrap()
            .check(&reply, &DIGEST, NONCE, unix_now());
        assert!(ok.is_ok(), "{:?}", ok.err());
    }

    #[test]
    fn a_tampered_token_does_not_verify() {
        let pki = Pki::new();
        let tsa = pki.tsa(&["tsa", "root"]).unwrap();
        let reply = pki.reply("good", &request(&DIGEST, NONCE));
        // The signature value is the last element of the reply.
        let mut bad = reply.clone();
        *bad.last_mut().unwrap() ^= 1;
        let err = tsa.check(&bad, &DIGEST, NONCE, unix_now()).unwrap_err();
        assert!(err.contains("signature does not verify"), "{err}");
        // A changed TSTInfo (its policy OID's last byte) no longer matches
        // the signed digest.
        let policy = [0x06, 0x04, 0x2a, 0x03, 0x04, 0x01];
        let at = reply.windows(6).position(|w| w == policy).unwrap();
        let mut bad = reply.clone();
        bad[at + 5] = 0x02;
        let err = tsa.check(&bad, &DIGEST, NONCE, unix_now()).unwrap_err();
        assert!(err.contains("message digest"), "{err}");
        // Every single-byte change and every truncation: an error or a
        // change the checks do not depend on (e.g. inside an embedded
        // certificate), never a panic.
        for i in 0..reply.len() {
            let mut b = reply.clone();
            b[i] ^= 0x41;
            let _ = tsa.check(&b, &DIGEST, NONCE, unix_now());
            assert!(tsa.check(&reply[..i], &DIGEST, NONCE, unix_now()).is_err());
        }
    }

    #[test]
    fn garbage_and_refusals_are_clear_errors() {
        let pki = Pki::new();
        let tsa = pki.tsa(&["tsa", "root"]).unwrap();
        let check = |b: &[u8]| tsa.check(b, &DIGEST, NONCE, unix_now()).unwrap_err();
        assert!(check(b"").contains("not a TimeStampResp"));
        assert!(check(b"<html>502 Bad Gateway</html>").contains("not a TimeStampResp"));
        assert!(check(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]).contains("not a TimeStampResp"));
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..2000 {
            let len = (seed % 300) as usize;
            let junk: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    (seed >> 24) as u8
                })
                .collect();
            assert!(tsa.check(&junk, &DIGEST, NONCE, unix_now()).is_err());
        }
        // rejection, with a status string and failInfo badAlg.
        let text = tlv(0x30, &tlv(0x0c, b"unsupported algorithm"));
        let fail = tlv(0x03, &[0x07, 0x80]);
        let rejected = tlv(0x30, &tlv(0x30, &[tlv(0x02, &[2]), text, fail].concat()));
        let err = check(&rejected);
        assert!(err.contains("the TSA refused: rejection"), "{err}");
        assert!(
            err.contains("unsupported algorithm") && err.contains("badAlg"),
            "{err}"
        );
        let waiting = tlv(0x30, &tlv(0x30, &tlv(0x02, &[3])));
        assert!(check(&waiting).contains("waiting"));
        let granted_empty = tlv(0x30, &tlv(0x30, &tlv(0x02, &[0])));
        assert!(check(&granted_empty).contains("no token"));
        let mut trailing = pki.reply("good", &request(&DIGEST, NONCE));
        trailing.push(0);
        assert!(check(&trailing).contains("data after"));
    }

    #[test]
    fn gen_time_forms() {
        let w = gen_time(b"20260102030405Z").unwrap();
        assert_eq!(w.rfc3339, "2026-01-02T03:04:05Z");
        assert_eq!(w.unix, 1_767_323_045);
        assert_eq!(
            gen_time(b"20260102030405.25Z").unwrap().rfc3339,
            "2026-01-02T03:04:05.25Z"
        );
        for bad in [
            &b"20260102030405"[..],
            b"2026010203040Z",
            b"20261302030405Z",
            b"20260102030405.Z",
            b"2026010203040xZ",
            b"\xff",
        ] {
            assert!(gen_time(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ca_chain_is_checked_when_loaded() {
        let pki = Pki::new();
        let err = pki.tsa(&["plain", "root"]).unwrap_err();
        assert!(err.contains("not valid for timestamping"), "{err}");
        let err = pki.tsa(&["tsa", "other"]).unwrap_err();
        assert!(err.contains("not valid for timestamping"), "{err}");
        std::fs::write(pki.path("empty.pem"), "").unwrap();
        let err = pki.tsa(&["empty"]).unwrap_err();
        assert!(err.contains("no certificate"), "{err}");
        let err = Tsa::new(&TimestampConfig {
            url: "http://127.0.0.1:9/".into(),
            ca_chain: pki.path("missing.pem"),
            timeout_secs: Some(3),
        })
        .unwrap_err();
        assert!(err.contains("missing.pem"), "{err}");
    }

    #[test]
    fn urls() {
        assert!(tsa_url("https://tsa.example.com/api/v1/timestamp").is_ok());
        assert!(tsa_url("http://127.0.0.1:3000/").is_ok());
        assert!(tsa_url("http://[::1]:3000/").is_ok());
        assert!(tsa_url("http://tsa.example.com/").is_err());
        assert!(tsa_url("file:///etc/passwd").is_err());
    }

    #[test]
    fn fail_info_names() {
        assert_eq!(fail_info(&[0x07, 0x80]), "badAlg");
        assert_eq!(
            fail_info(&[0x06, 0x00, 0x02, 0x00, 0x40]),
            "timeNotAvailable, systemFailure"
        );
        assert_eq!(fail_info(&[]), "none named");
    }
}
