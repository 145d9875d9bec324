//! Bearer OIDC ID tokens (GitHub Actions, GitLab CI, Kubernetes service-account
//! tokens): an optional second identity next to the transport's. The token's
//! signature is checked against its issuer's JWKS, `iss`, `aud` and `exp` are
//! checked, and its claims become usable in policy (`claims = { … }` in a rule).
//! A token that does not verify is refused (UNAUTHENTICATED); it never falls
//! back to "no token".
//!
//! Where the JWKS comes from, per issuer:
//! - `jwks_file`: read at start and at every reload (SIGHUP);
//! - `jwks_url`: fetched on first use, cached, re-fetched every
//!   `jwks_refresh_secs` (default 3600) and at once when a token names a key id
//!   the cached set lacks (issuers rotate keys that way), at most once per
//!   [`MIN_REFETCH`]. One fetch in flight per issuer. When a re-fetch fails the
//!   cached set keeps serving (logged); with no set at all the caller gets
//!   UNAVAILABLE, not a verdict on its token. `https://` only, except loopback.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use jsonwebtoken::{
    jwk::{AlgorithmParameters, EllipticCurve, JwkSet},
    Algorithm, DecodingKey, Validation,
};
use serde::Deserialize;

/// Fastest re-fetch of a JWKS URL when a token names an unknown key id: a
/// stream of made-up key ids cannot turn the broker into a load generator.
pub const MIN_REFETCH: Duration = Duration::from_secs(30);
/// Largest JWKS document accepted from a URL.
const MAX_JWKS_BYTES: usize = 1 << 20;

/// `[[oidc]]`: one trusted issuer.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcConfig {
    /// Exact `iss` value, e.g. "https://token.actions.githubusercontent.com".
    pub issuer: String,
    /// The `aud` tokens must carry for this broker (e.g. "keybroker").
    pub audience: String,
    /// The issuer's JWKS (JSON) in a file, e.g. saved from its `jwks_uri`.
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// The issuer's JWKS URL (its discovery document's `jwks_uri`).
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// Seconds between re-fetches of `jwks_url` (default 3600).
    #[serde(default)]
    pub jwks_refresh_secs: Option<u64>,
}

struct TrustedKey {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

/// A JWKS fetched from a URL, and when.
struct Fetched {
    keys: Arc<Vec<TrustedKey>>,
    at: Instant,
}

struct RemoteJwks {
    url: reqwest::Url,
    refresh: Duration,
    http: reqwest::Client,
    current: RwLock<Option<Fetched>>,
    /// Held while fetching (one fetch in flight).
    fetching: tokio::sync::Mutex<FetchState>,
}

#[derive(Default)]
struct FetchState {
    /// When a token's unknown key id last caused a fetch.
    last_kid_fetch: Option<Instant>,
    /// The last failed fetch: no new attempt for [`MIN_REFETCH`] after it, so a
    /// dead issuer costs callers one timeout, not one each.
    last_failure: Option<(Instant, String)>,
}

enum Keys {
    File(Arc<Vec<TrustedKey>>),
    Url(Box<RemoteJwks>),
}

struct Issuer {
    issuer: String,
    audience: String,
    keys: Keys,
}

/// Why a token was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenError {
    /// The token is wrong (signature, issuer, audience, expiry …): UNAUTHENTICATED.
    Invalid(String),
    /// The issuer's keys could not be had: UNAVAILABLE, try again.
    Unavailable(String),
}

impl std::fmt::Display for TokenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenError::Invalid(m) | TokenError::Unavailable(m) => f.write_str(m),
        }
    }
}

/// A verified token: who issued it, whom it names, and its claims as strings
/// (numbers and booleans are written out; nested objects are left out).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    /// `iss`.
    pub issuer: String,
    /// `sub`.
    pub subject: String,
    /// Every top-level string / number / boolean claim.
    pub claims: BTreeMap<String, String>,
}

/// The trusted issuers of one config.
#[derive(Default)]
pub struct Issuers {
    list: Vec<Issuer>,
}

impl std::fmt::Debug for Issuers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.list.iter().map(|i| &i.issuer))
            .finish()
    }
}

fn key_alg(params: &AlgorithmParameters, declared: Option<Algorithm>) -> Option<Algorithm> {
    // The JWK's own `alg` wins; else the one algorithm its key type is used with.
    declared.or(match params {
        AlgorithmParameters::RSA(_) => Some(Algorithm::RS256),
        AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
            EllipticCurve::P256 => Some(Algorithm::ES256),
            EllipticCurve::P384 => Some(Algorithm::ES384),
            _ => None,
        },
        _ => None,
    })
}

/// The signing keys of a JWKS document; `what` names its source in errors.
fn parse_jwks(text: &[u8], what: &str) -> Result<Vec<TrustedKey>, String> {
    let set: JwkSet =
        serde_json::from_slice(text).map_err(|e| format!("{what}: not a JWKS: {e}"))?;
    let mut keys = Vec::new();
    for jwk in &set.keys {
        let declared = jwk
            .common
            .key_algorithm
            .and_then(|a| a.to_string().parse::<Algorithm>().ok());
        let Some(alg) = key_alg(&jwk.algorithm, declared) else {
            continue;
        };
        let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("{what}: {e}"))?;
        keys.push(TrustedKey {
            kid: jwk.common.key_id.clone(),
            alg,
            key,
        });
    }
    if keys.is_empty() {
        return Err(format!("{what} has no RSA or P-256/P-384 signing key"));
    }
    Ok(keys)
}

/// `https://`, or `http://` to a loopback address (tests, a local proxy).
fn jwks_url(issuer: &str, url: &str) -> Result<reqwest::Url, String> {
    let u =
        reqwest::Url::parse(url).map_err(|e| format!("oidc {issuer}: jwks_url {url:?}: {e}"))?;
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
            "oidc {issuer}: jwks_url must be https:// (plain http only to a loopback address): {url}"
        )),
    }
}

impl RemoteJwks {
    fn snapshot(&self) -> Option<(Arc<Vec<TrustedKey>>, Instant)> {
        let g = self.current.read().unwrap_or_else(|p| p.into_inner());
        g.as_ref().map(|f| (f.keys.clone(), f.at))
    }

    /// The current key set, fetching it when there is none or it is older than
    /// the refresh interval, or when `want_kid` is missing from it — that last
    /// kind of fetch at most once per [`MIN_REFETCH`].
    async fn keys(
        &self,
        issuer: &str,
        want_kid: Option<&str>,
    ) -> Result<Arc<Vec<TrustedKey>>, TokenError> {
        enum Need {
            Nothing,
            Fetch,
            UnknownKid,
        }
        let need = |snap: &Option<(Arc<Vec<TrustedKey>>, Instant)>| match snap {
            None => Need::Fetch,
            Some((_, at)) if at.elapsed() >= self.refresh => Need::Fetch,
            Some((keys, _))
                if want_kid.is_some_and(|k| !keys.iter().any(|t| t.kid.as_deref() == Some(k))) =>
            {
                Need::UnknownKid
            }
            Some(_) => Need::Nothing,
        };
        let snap = self.snapshot();
        if let (Need::Nothing, Some((keys, _))) = (need(&snap), &snap) {
            return Ok(keys.clone());
        }
        let mut st = self.fetching.lock().await;
        // Someone else may have fetched while we waited.
        let snap = self.snapshot();
        match (need(&snap), &snap) {
            (Need::Nothing, Some((keys, _))) => return Ok(keys.clone()),
            (Need::UnknownKid, Some((keys, _))) => {
                if st
                    .last_kid_fetch
                    .is_some_and(|at| at.elapsed() < MIN_REFETCH)
                {
                    return Ok(keys.clone());
                }
                st.last_kid_fetch = Some(Instant::now());
            }
            _ => {}
        }
        if let Some((at, e)) = &st.last_failure {
            if at.elapsed() < MIN_REFETCH {
                return match snap {
                    Some((keys, _)) => Ok(keys),
                    None => Err(TokenError::Unavailable(format!(
                        "ID token: the keys of {issuer} are not available ({e}); try again"
                    ))),
                };
            }
        }
        let fetched = self.fetch().await;
        st.last_failure = match &fetched {
            Ok(_) => None,
            Err(e) => Some((Instant::now(), e.clone())),
        };
        match fetched {
            Ok(keys) => {
                let keys = Arc::new(keys);
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = Some(Fetched {
                    keys: keys.clone(),
                    at: Instant::now(),
                });
                tracing::info!(issuer, url = %self.url, keys = keys.len(), "fetched the issuer's JWKS");
                Ok(keys)
            }
            Err(e) => match snap {
                Some((keys, _)) => {
                    tracing::warn!(issuer, url = %self.url, "JWKS re-fetch failed, still using the cached keys: {e}");
                    Ok(keys)
                }
                None => Err(TokenError::Unavailable(format!(
                    "ID token: the keys of {issuer} are not available ({e}); try again"
                ))),
            },
        }
    }

    async fn fetch(&self) -> Result<Vec<TrustedKey>, String> {
        let what = format!("jwks_url {}", self.url);
        let mut resp = self
            .http
            .get(self.url.clone())
            .header("accept", "application/json")
            .send()
            .await
            .map_err(|e| format!("{what}: {e}"))?;
        if !resp.status().is_success() {
            return Err(format!("{what}: HTTP {}", resp.status()));
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| format!("{what}: {e}"))? {
            if body.len() + chunk.len() > MAX_JWKS_BYTES {
                return Err(format!("{what}: larger than {MAX_JWKS_BYTES} bytes"));
            }
            body.extend_from_slice(&chunk);
        }
        parse_jwks(&body, &what)
    }
}

impl Issuers {
    /// Loads every issuer's `jwks_file` (an unreadable or empty set is a config
    /// error) and checks every `jwks_url` (fetched on first use).
    pub fn new(configs: &[OidcConfig]) -> Result<Issuers, String> {
        let mut list = Vec::new();
        for c in configs {
            let keys = match (&c.jwks_file, &c.jwks_url) {
                (Some(file), None) => {
                    let what = format!("oidc {}: jwks_file {}", c.issuer, file.display());
                    let text = std::fs::read(file).map_err(|e| format!("{what}: {e}"))?;
                    Keys::File(Arc::new(parse_jwks(&text, &what)?))
                }
                (None, Some(url)) => {
                    let url = jwks_url(&c.issuer, url)?;
                    let refresh = Duration::from_secs(c.jwks_refresh_secs.unwrap_or(3600).max(1));
                    let http = reqwest::Client::builder()
                        .timeout(Duration::from_secs(10))
                        .connect_timeout(Duration::from_secs(5))
                        .redirect(reqwest::redirect::Policy::limited(3))
                        .build()
                        .map_err(|e| format!("oidc {}: HTTP client: {e}", c.issuer))?;
                    Keys::Url(Box::new(RemoteJwks {
                        url,
                        refresh,
                        http,
                        current: RwLock::new(None),
                        fetching: tokio::sync::Mutex::new(FetchState::default()),
                    }))
                }
                _ => {
                    return Err(format!(
                        "oidc {}: set exactly one of jwks_file and jwks_url",
                        c.issuer
                    ))
                }
            };
            list.push(Issuer {
                issuer: c.issuer.clone(),
                audience: c.audience.clone(),
                keys,
            });
        }
        Ok(Issuers { list })
    }

    /// Whether any issuer is configured.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Fetches every `jwks_url` once (at start, so the first caller does not
    /// wait); failures are logged and retried on first use.
    pub async fn prefetch(&self) {
        for i in &self.list {
            if let Keys::Url(r) = &i.keys {
                if let Err(e) = r.keys(&i.issuer, None).await {
                    tracing::warn!(issuer = %i.issuer, "{e}");
                }
            }
        }
    }

    /// Verifies a compact JWS. Errors say what failed, never echo the token.
    pub async fn verify(&self, token: &str) -> Result<Token, TokenError> {
        let invalid = TokenError::Invalid;
        if self.list.is_empty() {
            return Err(invalid(
                "this broker trusts no ID token issuer ([[oidc]] in its config)".into(),
            ));
        }
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| invalid(format!("ID token: {e}")))?;
        // Which issuer: read (not trust) `iss`, then verify with that issuer's keys.
        let claimed = unverified_issuer(token)
            .ok_or_else(|| invalid("ID token: no readable iss claim".into()))?;
        let issuer = self
            .list
            .iter()
            .find(|i| i.issuer == claimed)
            .ok_or_else(|| invalid(format!("ID token: issuer {claimed:?} is not trusted here")))?;
        let keys = match &issuer.keys {
            Keys::File(k) => k.clone(),
            Keys::Url(r) => r.keys(&issuer.issuer, header.kid.as_deref()).await?,
        };
        let candidates: Vec<&TrustedKey> = keys
            .iter()
            .filter(|k| header.kid.is_none() || k.kid == header.kid)
            .filter(|k| k.alg == header.alg)
            .collect();
        if candidates.is_empty() {
            return Err(invalid(format!(
                "ID token: no key of {claimed} matches its kid {:?} / alg {:?} (JWKS out of date?)",
                header.kid, header.alg
            )));
        }
        let mut last = String::new();
        for k in candidates {
            let mut v = Validation::new(k.alg);
            v.set_issuer(&[&issuer.issuer]);
            v.set_audience(&[&issuer.audience]);
            v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
            v.leeway = 30;
            match jsonwebtoken::decode::<BTreeMap<String, serde_json::Value>>(token, &k.key, &v) {
                Ok(data) => return Ok(to_token(data.claims)),
                Err(e) => last = e.to_string(),
            }
        }
        Err(invalid(format!("ID token from {claimed}: {last}")))
    }
}

fn unverified_issuer(token: &str) -> Option<String> {
    use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};
    let payload = token.split('.').nth(1)?;
    let bytes = URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    v.get("iss")?.as_str().map(str::to_string)
}

fn to_token(raw: BTreeMap<String, serde_json::Value>) -> Token {
    let mut claims = BTreeMap::new();
    for (k, v) in raw {
        let s = match v {
            serde_json::Value::String(s) => s,
            serde_json::Value::Number(n) => n.to_string(),
            serde_json::Value::Bool(b) => b.to_string(),
            _ => continue,
        };
        claims.insert(k, s);
    }
    Token {
        issuer: claims.get("iss").cloned().unwrap_or_default(),
        subject: claims.get("sub").cloned().unwrap_or_default(),
        claims,
    }
}

/// `*` matches any run of characters (slashes and colons included: claim values
/// such as `repo:acme/api:ref:refs/heads/main` are not paths).
pub fn claim_match(pattern: &str, value: &str) -> bool {
    crate::policy::wildcard_match(pattern.as_bytes(), value.as_bytes(), false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claim_globs() {
        assert!(claim_match("acme/*", "acme/api"));
        assert!(claim_match(
            "repo:acme/api:ref:refs/heads/*",
            "repo:acme/api:ref:refs/heads/main"
        ));
        assert!(!claim_match("acme/api", "acme/api2"));
        assert!(claim_match("*", ""));
    }
}
