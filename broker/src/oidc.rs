//! Bearer OIDC ID tokens (GitHub Actions, GitLab CI, Kubernetes service-account
//! tokens): an optional second identity next to the transport's. The token's
//! signature is checked against its issuer's JWKS (from a file the operator
//! refreshes, read at start and at every reload), `iss`, `aud` and `exp` are
//! checked, and its claims become usable in policy (`claims = { … }` in a rule).
//! A token that does not verify is refused (UNAUTHENTICATED); it never falls
//! back to "no token".

use std::{collections::BTreeMap, path::PathBuf};

use jsonwebtoken::{
    jwk::{AlgorithmParameters, EllipticCurve, JwkSet},
    Algorithm, DecodingKey, Validation,
};
use serde::Deserialize;

/// `[[oidc]]`: one trusted issuer.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcConfig {
    /// Exact `iss` value, e.g. "https://token.actions.githubusercontent.com".
    pub issuer: String,
    /// The `aud` tokens must carry for this broker (e.g. "keybroker").
    pub audience: String,
    /// The issuer's JWKS (JSON), e.g. saved from its `jwks_uri`.
    pub jwks_file: PathBuf,
}

struct TrustedKey {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

struct Issuer {
    issuer: String,
    audience: String,
    keys: Vec<TrustedKey>,
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
            .entries(self.list.iter().map(|i| (&i.issuer, i.keys.len())))
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

impl Issuers {
    /// Loads every issuer's JWKS; an unreadable or empty set is a config error.
    pub fn new(configs: &[OidcConfig]) -> Result<Issuers, String> {
        let mut list = Vec::new();
        for c in configs {
            let shown = c.jwks_file.display();
            let text = std::fs::read_to_string(&c.jwks_file)
                .map_err(|e| format!("oidc {}: jwks_file {shown}: {e}", c.issuer))?;
            let set: JwkSet = serde_json::from_str(&text)
                .map_err(|e| format!("oidc {}: jwks_file {shown}: not a JWKS: {e}", c.issuer))?;
            let mut keys = Vec::new();
            for jwk in &set.keys {
                let declared = jwk
                    .common
                    .key_algorithm
                    .and_then(|a| a.to_string().parse::<Algorithm>().ok());
                let Some(alg) = key_alg(&jwk.algorithm, declared) else {
                    continue;
                };
                let key = DecodingKey::from_jwk(jwk)
                    .map_err(|e| format!("oidc {}: jwks_file {shown}: {e}", c.issuer))?;
                keys.push(TrustedKey {
                    kid: jwk.common.key_id.clone(),
                    alg,
                    key,
                });
            }
            if keys.is_empty() {
                return Err(format!(
                    "oidc {}: jwks_file {shown} has no RSA or P-256/P-384 signing key",
                    c.issuer
                ));
            }
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

    /// Verifies a compact JWS. Errors say what failed, never echo the token.
    pub fn verify(&self, token: &str) -> Result<Token, String> {
        if self.list.is_empty() {
            return Err("this broker trusts no ID token issuer ([[oidc]] in its config)".into());
        }
        let header = jsonwebtoken::decode_header(token).map_err(|e| format!("ID token: {e}"))?;
        // Which issuer: read (not trust) `iss`, then verify with that issuer's keys.
        let claimed = unverified_issuer(token).ok_or("ID token: no readable iss claim")?;
        let issuer = self
            .list
            .iter()
            .find(|i| i.issuer == claimed)
            .ok_or_else(|| format!("ID token: issuer {claimed:?} is not trusted here"))?;
        let candidates: Vec<&TrustedKey> = issuer
            .keys
            .iter()
            .filter(|k| header.kid.is_none() || k.kid == header.kid)
            .filter(|k| k.alg == header.alg)
            .collect();
        if candidates.is_empty() {
            return Err(format!(
                "ID token: no key of {claimed} matches its kid {:?} / alg {:?} (JWKS out of date?)",
                header.kid, header.alg
            ));
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
        Err(format!("ID token from {claimed}: {last}"))
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
    fn m(p: &[u8], s: &[u8]) -> bool {
        match p {
            [] => s.is_empty(),
            [b'*', rest @ ..] => (0..=s.len()).any(|i| m(rest, &s[i..])),
            [c, rest @ ..] => s.first() == Some(c) && m(rest, &s[1..]),
        }
    }
    m(pattern.as_bytes(), value.as_bytes())
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
